-- ARGV: prefix, sender, to
local a, b, err = pair(ARGV[2], ARGV[3])
if err then return err end
if a.s == 'connected' then
  if a.t == ARGV[3] then return trans end
  return {'connected-elsewhere'}
end
if b.s == 'connected' then return {'peer-busy'} end
if a.s == 'connecting' and a.t == ARGV[3] then return trans end
set(ARGV[2], a, 'connecting', ARGV[3])
return trans
