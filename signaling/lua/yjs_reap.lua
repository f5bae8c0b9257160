-- y-webrtc topics (see yjs_count.lua).  ARGV: timeout_ms, the calling node
-- -> 1 if the calling node's counts are gone (it must sync them again).
-- Forgets the counts of every node silent for longer than the timeout (or
-- no longer tracked at all: reaped by reap.lua).
local limit = now_ms() - tonumber(ARGV[5])
local out = {0}
for _, node in ipairs(redis.call('SMEMBERS', P .. 'yjs:nodes')) do
  if node ~= ARGV[6] then
    local seen = redis.call('ZSCORE', P .. 'nodes', node)
    if not seen or tonumber(seen) < limit then
      local mine = P .. 'yjs:of:' .. node
      for _, topic in ipairs(redis.call('SMEMBERS', mine)) do
        redis.call('HDEL', P .. 'yjs:n:' .. topic, node)
      end
      redis.call('DEL', mine)
      redis.call('SREM', P .. 'yjs:nodes', node)
      table.insert(out, node)
    end
  end
end
if redis.call('SISMEMBER', P .. 'yjs:nodes', ARGV[6]) == 0 then out[1] = 1 end
return out
