-- ARGV: sender, to
local a, b, err = paired(ARGV[4], ARGV[5])
if err then return err end
return trans
