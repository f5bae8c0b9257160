-- ARGV: to, frame -> what send() answers, or -1 if no such peer
local p = get(ARGV[4])
if not p then return -1 end
return send(ARGV[4], p, ARGV[5])
