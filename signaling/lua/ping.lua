-- ARGV: sender, to
local a, b, err = pair(ARGV[5], ARGV[6])
if err then return err end
if a.s == 'connected' then
  if a.t == ARGV[6] then return trans end
  return {'connected-elsewhere'}
end
if b.s == 'connected' then return {'peer-busy'} end
if a.s == 'connecting' and a.t == ARGV[6] then return trans end
set(ARGV[5], a, 'connecting', ARGV[6])
return trans
