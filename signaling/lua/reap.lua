-- ARGV: prefix, timeout_ms, the calling node (alive: never reaped) -> ids removed
local removed = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', now_ms() - tonumber(ARGV[2]))) do
  if node ~= ARGV[3] then
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
      drop(id, true)
      table.insert(removed, id)
    end
    redis.call('DEL', P .. 'node:' .. node)
    redis.call('ZREM', P .. 'nodes', node)
  end
end
return removed
