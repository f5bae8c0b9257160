local a, b, err = paired(ARGV[2], ARGV[3])
if err then return err end
return trans
