-- @needs paired send
-- ARGV: then (sender, to, frame) for each relay a node called in one reactor
-- turn -> for each, in order: the name of check_paired's refusal, or what
-- send() answers.  The frames for peers online on one node go in one
-- publish to its channel, after the checks: a lone frame as send() sends
-- it, several as '*' and then '<id>\n<length>\n<frame>' for each, in order.
-- Nothing here changes a peer, so a pair checked once is known for the rest.
local out, checked, groups, nodes = {}, {}, {}, {}
for i = 5, #ARGV, 3 do
  local k = #out + 1
  local to, frame = ARGV[i + 1], ARGV[i + 2]
  local key = ARGV[i] .. '\n' .. to
  local c = checked[key]
  if not c then
    local _, b, err = paired(ARGV[i], to)
    c = {b, err}
    checked[key] = c
  end
  local b, err = c[1], c[2]
  if err then
    out[k] = err[1]
  elseif b.o == 0 then
    out[k] = send(to, b, frame)
  else
    local g = groups[b.n]
    if not g then
      g = {ids = {}, frames = {}, at = {}}
      groups[b.n] = g
      nodes[#nodes + 1] = b.n
    end
    local n = #g.at + 1
    g.ids[n], g.frames[n], g.at[n] = to, frame, k
    out[k] = 0
  end
end
for _, node in ipairs(nodes) do
  local g = groups[node]
  local message
  if #g.at == 1 then
    message = g.ids[1] .. '\n' .. g.frames[1]
  else
    local parts = {'*'}
    for n = 1, #g.at do
      parts[n + 1] = g.ids[n] .. '\n' .. #g.frames[n] .. '\n' .. g.frames[n]
    end
    message = table.concat(parts)
  end
  local receivers = redis.call('PUBLISH', P .. 'to:' .. node, message)
  for _, k in ipairs(g.at) do out[k] = receivers end
end
return out
