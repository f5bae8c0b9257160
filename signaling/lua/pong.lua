-- ARGV: sender, to
local b, a, err = pair(ARGV[5], ARGV[6])
if err then return err end
if b.s == 'connected' and b.t == ARGV[6] then return trans end
if a.s == 'connecting' and a.t == ARGV[5] and b.s ~= 'connected' then
  set(ARGV[6], a, 'connected', ARGV[5])
  set(ARGV[5], b, 'connected', ARGV[6])
  return trans
end
return {'not-waiting'}
