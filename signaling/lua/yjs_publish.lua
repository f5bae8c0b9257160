-- y-webrtc topics (see yjs_count.lua).  ARGV: topic, node, its subscribers
-- of the topic, the frame's head -> the topic's subscribers on every node.
-- Published on the topic's channel, as <node>\n<subscribers>\n<head>, only
-- if another node counts subscribers.
local topic, node = ARGV[5], ARGV[6]
local total, others = tonumber(ARGV[7]), 0
local counts = redis.call('HGETALL', P .. 'yjs:n:' .. topic)
for i = 1, #counts, 2 do
  if counts[i] ~= node then others = others + tonumber(counts[i + 1]) end
end
total = total + others
if others > 0 then
  redis.call('PUBLISH', P .. 'yjs:t:' .. topic, node .. '\n' .. total .. '\n' .. ARGV[8])
end
return total
