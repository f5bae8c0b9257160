local b, a, err = pair(ARGV[2], ARGV[3])
if err then return err end
if b.s == 'connected' and b.t == ARGV[3] then return trans end
if a.s == 'connecting' and a.t == ARGV[2] and b.s ~= 'connected' then
  set(ARGV[3], a, 'connected', ARGV[2])
  set(ARGV[2], b, 'connected', ARGV[3])
  return trans
end
return {'not-waiting'}
