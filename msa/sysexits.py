"""sysexits(3) codes, as Postfix's sendmail uses them."""

EX_OK = 0
EX_USAGE = 64        # bad option, no recipients
EX_DATAERR = 65      # unreadable or malformed input
EX_NOINPUT = 66
EX_NOUSER = 67       # bad address
EX_UNAVAILABLE = 69  # spool unavailable
EX_SOFTWARE = 70
EX_OSERR = 71        # no login name
EX_OSFILE = 72       # config file missing or bad
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75     # cannot write the queue file now
EX_PROTOCOL = 76
EX_NOPERM = 77       # not permitted
EX_CONFIG = 78
