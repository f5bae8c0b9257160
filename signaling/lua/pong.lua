-- ARGV: sender, to
local b, a, err = pair(ARGV[4], ARGV[5])
if err then return err end
if b.s == 'connected' and b.t == ARGV[5] then return trans end
if a.s == 'connecting' and a.t == ARGV[4] and b.s ~= 'connected' then
  set(ARGV[5], a, 'connected', ARGV[4])
  set(ARGV[4], b, 'connected', ARGV[5])
  return trans
end
return {'not-waiting'}
