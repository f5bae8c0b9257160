-- ARGV: id, node, ip, at, connection.  The node's heartbeat is recorded
-- with the peer: a node that dies before its first heartbeat is still reaped.
if redis.call('HEXISTS', PEERS, ARGV[4]) == 1 then return {'taken'} end
beat(ARGV[5])
put(ARGV[4], {n = ARGV[5], ip = ARGV[6], at = tonumber(ARGV[7]), s = 'idle', t = '', c = ARGV[8]})
redis.call('SADD', P .. 'node:' .. ARGV[5], ARGV[4])
return trans
