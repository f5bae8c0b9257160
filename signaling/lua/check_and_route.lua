-- ARGV: prefix, sender, to, frame -> check_paired's error, or {'', receivers of
-- the publish on the target's node}: the check and the delivery in one round trip
local a, b, err = paired(ARGV[2], ARGV[3])
if err then return err end
return {'', redis.call('PUBLISH', P .. 'to:' .. b.n, ARGV[3] .. '\n' .. ARGV[4])}
