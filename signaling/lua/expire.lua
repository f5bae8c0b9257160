-- ARGV: id, connection (whose socket loss began the grace period) ->
-- queued messages dropped with it, or -1 if that grace period is not the
-- peer's any more (it resumed, perhaps to lose its socket again).  Removes
-- the peer; its watchers get peer_left.
local id = ARGV[5]
local p = get(id)
if not p or p.o ~= 0 or p.c ~= ARGV[6] then return -1 end
local dropped = redis.call('LLEN', P .. 'q:' .. id)
drop(id, true)
return dropped
