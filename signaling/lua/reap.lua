-- ARGV: timeout_ms, the calling node (alive: never reaped) -> {peers of
-- silent nodes put in their grace period, then the ids removed...}.
-- The peers of a node silent for longer than the timeout lost their
-- sockets with it: each gets its grace period (or is removed, without
-- one); peers whose grace period is over are removed.
local now = now_ms()
local out = {0}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', now - tonumber(ARGV[5]))) do
  if node ~= ARGV[6] then
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
      local p = get(id)
      if p and GRACE > 0 then
        suspend(id, p)
        out[1] = out[1] + 1
      else
        drop(id, true)
        table.insert(out, id)
      end
    end
    redis.call('DEL', P .. 'node:' .. node)
    redis.call('ZREM', P .. 'nodes', node)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'grace', '-inf', now)) do
  drop(id, true)
  table.insert(out, id)
end
return out
