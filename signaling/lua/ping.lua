-- ARGV: sender, to
local a, b, err = pair(ARGV[4], ARGV[5])
if err then return err end
if a.s == 'connected' then
  if a.t == ARGV[5] then return trans end
  return {'connected-elsewhere'}
end
if b.s == 'connected' then return {'peer-busy'} end
if a.s == 'connecting' and a.t == ARGV[5] then return trans end
set(ARGV[4], a, 'connecting', ARGV[5])
return trans
