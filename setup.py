from setuptools import setup

setup(
    name="msa",
    version="0.1.0",
    description="A mail submission agent: SMTP submission, sendmail, a durable spool and an MX relay",
    packages=["msa", "spool"],
    python_requires=">=3.11",
    install_requires=[
        "aiosmtpd>=1.4,<1.5",  # the edge subclasses its SMTP session (tested on 1.4.6)
        "aiosmtplib>=3.0",
        "dnspython>=2.4",
        "filelock>=3.12,<3.17",  # claims; 4.x acquire is ~15x slower (see spool/core.py)
        "inotify_simple>=1.3",
        "python-daemon>=3.0",
        "argon2-cffi>=23.1",   # password hashes: a well-kept argon2id binding
        "cryptography>=41",    # the demo's self-signed certificate
        "uvloop>=0.19",        # libuv event loop: ~1/5 less CPU per message (bench/)
    ],
    extras_require={"test": ["pytest>=7", "trustme>=1.1", "hypothesis>=6.80"]},
    entry_points={"console_scripts": [
        "msa=msa.cli:main",
        "sendmail=msa.submission.sendmail:main",
        "mailq=msa.submission.sendmail:mailq_main",
        "newaliases=msa.submission.sendmail:newaliases_main",
    ]},
    data_files=[("share/man/man1", ["man/sendmail.1", "man/mailq.1", "man/newaliases.1"]),
                ("share/man/man5", ["man/msa.toml.5", "man/msa-spool.5"]),
                ("share/man/man8", ["man/msa.8", "man/msa-queue.8", "man/msa-user.8"])],
)
