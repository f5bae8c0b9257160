-- ARGV: prefix, to, frame -> receivers of the publish, or -1 if no such peer
local p = get(ARGV[2])
if not p then return -1 end
return redis.call('PUBLISH', P .. 'to:' .. p.n, ARGV[2] .. '\n' .. ARGV[3])
