-- ARGV: id, node, ip, at, connection.  The node's heartbeat is recorded
-- with the peer: a node that dies before its first heartbeat is still reaped.
if redis.call('HEXISTS', PEERS, ARGV[5]) == 1 then return {'taken'} end
beat(ARGV[6])
put(ARGV[5], {n = ARGV[6], ip = ARGV[7], at = tonumber(ARGV[8]), s = 'idle', t = '', c = ARGV[9]})
redis.call('SADD', P .. 'node:' .. ARGV[6], ARGV[5])
return trans
