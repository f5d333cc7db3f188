#!/usr/bin/env python3
"""The Mail Submission Agent tutorial (seed/msa-tutorial.txt), step by step,
with msa.

Paths and ports come from the environment so the test suite can run this
file on loopback ports with a temporary spool; the defaults are the
tutorial's (ports 587 and 465 need root, then Step 5 drops privileges).

    MSA_TUTORIAL_SPOOL     spool directory        (/var/spool/msa)
    MSA_TUTORIAL_CERT/KEY  certificate and key    (/path/to/cert.pem, key.pem)
    MSA_TUTORIAL_PORT      submission port        (587)
    MSA_TUTORIAL_SSL_PORT  implicit TLS port      (465)
    MSA_TUTORIAL_HOST      listening address      ('' = all)
    MSA_TUTORIAL_USER      user to become         (smtp-user; '' = stay)
    MSA_TUTORIAL_FORCE_MX  domain=host:port,...   (tests: MX hosts on loopback)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

env = os.environ.get
HOST = env("MSA_TUTORIAL_HOST", "")
DOMAIN = "example.org"

# Step 1: Create the Relay

from msa.api import MxSmtpRelay

tls_args = {'keyfile': env("MSA_TUTORIAL_KEY", '/path/to/key.pem'),
            'certfile': env("MSA_TUTORIAL_CERT", '/path/to/cert.pem')}
force_mx = dict(x.split("=", 1) for x in env("MSA_TUTORIAL_FORCE_MX", "").split(",") if x)
relay = MxSmtpRelay(tls=tls_args, connect_timeout=20, command_timeout=10,
                    data_timeout=20, idle_timeout=30, force_mx=force_mx)

# Step 2: Create the Queue (the storage is a durable spool directory,
# where the tutorial used shelve files)

from msa.api import Queue, SpoolStorage

storage = SpoolStorage(env("MSA_TUTORIAL_SPOOL", '/var/spool/msa'))
queue = Queue(storage, relay)

# Step 3: Add Queue Policies

from msa.api import AddDateHeader, AddMessageIdHeader, AddReceivedHeader, RemoveBccHeader

queue.add_policy(AddDateHeader())
queue.add_policy(AddMessageIdHeader(hostname='mail.example.org'))
queue.add_policy(AddReceivedHeader(hostname='mail.example.org'))
queue.add_policy(RemoveBccHeader())

from msa.api import RecipientDomainSplit

queue.add_policy(RecipientDomainSplit())
queue.start()

# Step 4: Create the Edge

from msa.api import Auth, CredentialsInvalidError, SmtpEdge, SmtpValidators


class MyAuth(Auth):
    def verify_secret(self, username, password, identity=None):
        if username != 'testuser' or password != 'testpassword':
            raise CredentialsInvalidError()
        return 'testuser'

    def get_secret(self, username, identity=None):
        if username == 'testuser':
            return 'testpassword', 'testuser'
        raise CredentialsInvalidError()


class MyValidators(SmtpValidators):
    def handle_mail(self, reply, sender):
        if not self.session.auth_result:
            reply.code = '550'
            reply.message = '5.7.1 <{0}> Not authenticated'


# sender_domain: 'testuser' may send as testuser@example.org (msa checks
# that an authenticated user only sends as addresses they own).
edge = SmtpEdge((HOST, int(env("MSA_TUTORIAL_PORT", 587))), queue, tls=tls_args,
                validator_class=MyValidators, auth_class=MyAuth, sender_domain=DOMAIN)
ssl_edge = SmtpEdge((HOST, int(env("MSA_TUTORIAL_SSL_PORT", 465))), queue, tls=tls_args,
                    tls_immediately=True, validator_class=MyValidators, auth_class=MyAuth,
                    sender_domain=DOMAIN)

# Step 5: Daemonizing (bind the ports first: slimta's gevent.sleep())

from msa import api, system

api.start(edge, ssl_edge)
system.drop_privileges(env("MSA_TUTORIAL_USER", 'smtp-user') or None,
                       env("MSA_TUTORIAL_USER", 'smtp-user') or None)
if not env("MSA_TUTORIAL_KEEP_STDIO"):
    system.redirect_stdio()  # Redirects all streams to /dev/null by default.

# Step 6: Profit

try:
    api.run_forever(queue, edge, ssl_edge)
except KeyboardInterrupt:
    pass
