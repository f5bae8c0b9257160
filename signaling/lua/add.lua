-- ARGV: prefix, id, node, ip, at.  The node's heartbeat is recorded with
-- the peer: a node that dies before its first heartbeat is still reaped.
if redis.call('HEXISTS', PEERS, ARGV[2]) == 1 then return {'taken'} end
beat(ARGV[3])
put(ARGV[2], {n = ARGV[3], ip = ARGV[4], at = tonumber(ARGV[5]), s = 'idle', t = ''})
redis.call('SADD', P .. 'node:' .. ARGV[3], ARGV[2])
return trans
