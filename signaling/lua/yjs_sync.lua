-- y-webrtc topics (see yjs_count.lua).  ARGV: node, then (topic, count)
-- pairs -> nothing: the node's counts are exactly these from now on.
local node = ARGV[5]
local mine = P .. 'yjs:of:' .. node
for _, topic in ipairs(redis.call('SMEMBERS', mine)) do
  redis.call('HDEL', P .. 'yjs:n:' .. topic, node)
end
redis.call('DEL', mine)
for i = 6, #ARGV, 2 do
  redis.call('HSET', P .. 'yjs:n:' .. ARGV[i], node, ARGV[i + 1])
  redis.call('SADD', mine, ARGV[i])
end
if #ARGV > 5 then
  redis.call('SADD', P .. 'yjs:nodes', node)
else
  redis.call('SREM', P .. 'yjs:nodes', node)
end
