-- ARGV: node, then id, ip, at, connection quads of this node's live peers
-- -> {forgotten, added, then the ids held elsewhere now...}.
-- Record the node's heartbeat; forget its peers that are gone (their
-- watchers get peer_left); register the live ones that Redis lost (idle);
-- bring back online those put in grace while the node was silent (what was
-- queued for them is published to the node, in order); and name the ones
-- that resumed on another connection meanwhile (the node closes its own).
local node = ARGV[5]
beat(node)
local live = {}
for i = 6, #ARGV, 4 do live[ARGV[i]] = true end
local out = {0, 0}
for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
  if not live[id] then drop(id, true); out[1] = out[1] + 1 end
end
for i = 6, #ARGV, 4 do
  local id = ARGV[i]
  local p = get(id)
  if not p then
    put(id, {n = node, ip = ARGV[i + 1], at = tonumber(ARGV[i + 2]), s = 'idle', t = '', c = ARGV[i + 3]})
    redis.call('SADD', P .. 'node:' .. node, id)
    out[2] = out[2] + 1
  elseif p.n ~= node or p.c ~= ARGV[i + 3] then
    table.insert(out, id)
  elseif p.o == 0 then
    p.o = nil
    put(id, p)
    redis.call('SADD', P .. 'node:' .. node, id)
    redis.call('ZREM', P .. 'grace', id)
    local q = P .. 'q:' .. id
    for _, frame in ipairs(redis.call('LRANGE', q, 0, -1)) do
      redis.call('PUBLISH', P .. 'to:' .. node, id .. '\n' .. frame)
    end
    forget_queue(id)
  end
end
return out
