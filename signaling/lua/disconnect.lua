local a, b, err = pair(ARGV[2], ARGV[3])
if err then return err end
if a.t ~= ARGV[3] then return {'not-pointing'} end
set(ARGV[2], a, 'idle', '')
if b.t == ARGV[2] then set(ARGV[3], b, 'idle', '') end
return trans
