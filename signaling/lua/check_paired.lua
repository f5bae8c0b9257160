-- ARGV: sender, to
local a, b, err = paired(ARGV[5], ARGV[6])
if err then return err end
return trans
