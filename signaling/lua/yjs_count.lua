-- y-webrtc topics (signaling.cluster_topics).  Keys: yjs:n:<topic>, hash
-- node -> its subscribers of the topic; yjs:of:<node>, set of the topics
-- it counts some in; yjs:nodes, set of the nodes that count some.
-- ARGV: node, then (topic, change) pairs -> nothing.  Changes add up in
-- any order (a node's updates may run on either pool connection).
local node = ARGV[5]
local mine = P .. 'yjs:of:' .. node
for i = 6, #ARGV, 2 do
  local topic = ARGV[i]
  local key = P .. 'yjs:n:' .. topic
  if redis.call('HINCRBY', key, node, tonumber(ARGV[i + 1])) <= 0 then
    redis.call('HDEL', key, node)
    redis.call('SREM', mine, topic)
  else
    redis.call('SADD', mine, topic)
  end
end
redis.call('SADD', P .. 'yjs:nodes', node)
