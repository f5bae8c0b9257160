-- @needs get send
-- ARGV: to, frame -> what send() answers, or -1 if no such peer
local p = get(ARGV[5])
if not p then return -1 end
return send(ARGV[5], p, ARGV[6])
