-- @needs get pass_on
-- ARGV: id, the calling node, then frames: messages that reached the
-- calling node for a peer no longer connected to it -> how many were passed
-- on (pass_on).  (Those held at the loss of its socket go with settle.)
local p = get(ARGV[5])
if not p then return 0 end
return pass_on(ARGV[5], p, ARGV[6], 7)
