-- ARGV: prefix, node, then id, ip, at triples of this node's live peers.
-- Record the node's heartbeat, forget its peers that are gone (their
-- watchers get peer_left), and register the live ones that Redis lost (idle).
local node = ARGV[2]
beat(node)
local live = {}
for i = 3, #ARGV, 3 do live[ARGV[i]] = true end
local dropped, added = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
  if not live[id] then drop(id, true); dropped = dropped + 1 end
end
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local p = get(id)
  if not p then
    put(id, {n = node, ip = ARGV[i + 1], at = tonumber(ARGV[i + 2]), s = 'idle', t = ''})
    redis.call('SADD', P .. 'node:' .. node, id)
    added = added + 1
  end
end
return {dropped, added}
