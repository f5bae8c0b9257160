-- @needs paired send
-- ARGV: sender, to, frame -> check_paired's error, or {'', what send()
-- answers}: the check and the delivery (or queueing) in one round trip
local a, b, err = paired(ARGV[5], ARGV[6])
if err then return err end
return {'', send(ARGV[6], b, ARGV[7])}
