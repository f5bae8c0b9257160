-- ARGV: id, node, ip, at, connection: a connection to node presented a
-- valid resume token for id -> {'resumed', queued frames...} if it was in
-- its grace period; {'settling'} if it is, but the node that suspended it
-- has not yet handed over the messages held at the loss (suspend: try
-- again shortly; nothing else changed); {'moved'} if it was still held by
-- another connection (which gets '!evict:<its connection>' on its node's
-- channel and is closed there without ending the session); {'new'} if it
-- was gone (the same id, idle again).  The node's heartbeat is recorded, as with add.
local id, node = ARGV[5], ARGV[6]
beat(node)
local p = get(id)
if not p then
  put(id, {n = node, ip = ARGV[7], at = tonumber(ARGV[8]), s = 'idle', t = '', c = ARGV[9]})
  redis.call('SADD', P .. 'node:' .. node, id)
  return {'new'}
end
-- the node that lost its socket has not handed over what reached it then
if p.o == 0 and p.h and now_ms() < p.h then return {'settling'} end
local was_offline, old_node, old_conn = p.o == 0, p.n, p.c
p.o = nil; p.h = nil; p.n = node; p.c = ARGV[9]; p.ip = ARGV[7]
put(id, p)
redis.call('SADD', P .. 'node:' .. node, id)
if was_offline then
  redis.call('ZREM', P .. 'grace', id)
  local q = P .. 'q:' .. id
  local out = {'resumed'}
  for _, frame in ipairs(redis.call('LRANGE', q, 0, -1)) do table.insert(out, frame) end
  forget_queue(id)
  return out
end
if old_node ~= node then redis.call('SREM', P .. 'node:' .. old_node, id) end
redis.call('PUBLISH', P .. 'to:' .. old_node, id .. '\n!evict:' .. old_conn)
return {'moved'}
