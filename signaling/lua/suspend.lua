-- ARGV: id, node, connection -> the end of its grace period (Redis ms), or
-- 0 if the peer is not that connection's any more (it resumed elsewhere,
-- or left).  Then publishes '!settled:<connection>' for the peer on the
-- node's own channel: when the node reads it, every message published to
-- it for that peer before this script ran has arrived (and is queued again
-- with forward, in front).
local id = ARGV[5]
local p = get(id)
if not p or p.o == 0 or p.n ~= ARGV[6] or p.c ~= ARGV[7] then return 0 end
local deadline = suspend(id, p)
redis.call('PUBLISH', P .. 'to:' .. ARGV[6], id .. '\n!settled:' .. ARGV[7])
return deadline
