-- ARGV: id, node, connection -> the end of its grace period (Redis ms), or
-- 0 if the peer is not that connection's any more (it resumed elsewhere,
-- or left).  Then publishes '!settled:<connection>' for the peer on the
-- node's own channel: when the node reads it, every message published to
-- it for that peer before this script ran has arrived, and the node hands
-- them over with settle (queued in front).  Until it has (h: a deadline,
-- Redis ms, in case the node dies first), a resume waits ('settling'), so
-- that those messages are not delivered after the ones queued since.
local id = ARGV[5]
local p = get(id)
if not p or p.o == 0 or p.n ~= ARGV[6] or p.c ~= ARGV[7] then return 0 end
p.h = now_ms() + 2000
local deadline = suspend(id, p)
redis.call('PUBLISH', P .. 'to:' .. ARGV[6], id .. '\n!settled:' .. ARGV[7])
return deadline
