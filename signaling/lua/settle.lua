-- @needs get put pass_on
-- ARGV: id, the calling node, the connection whose loss began the grace
-- period, then frames: the messages that reached the node for the peer
-- between that loss and '!settled' (see suspend) -> how many were passed
-- on.  In that grace period still, they go in front of those queued since,
-- and the hand-over is done (a resume waits for it no longer); else they
-- are passed on as forward does.
local id = ARGV[5]
local p = get(id)
if not p then return 0 end
if not (p.o == 0 and p.c == ARGV[7]) then return pass_on(id, p, ARGV[6], 8) end
for i = #ARGV, 8, -1 do
  redis.call('LPUSH', P .. 'q:' .. id, ARGV[i])
  redis.call('INCRBY', P .. 'qb:' .. id, #ARGV[i])
end
if p.h then p.h = nil; put(id, p) end
return #ARGV - 7
