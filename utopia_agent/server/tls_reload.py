"""SIGHUP on HTTPS: the certificate and key now in the files go to new connections, and nothing drops.

gunicorn's own SIGHUP starts new workers and stops the old ones, whose kept-alive connections
close under their clients, and it loads the whole agent again (NVML, the engine client) to
change two files. On HTTPS the agent's master takes SIGHUP instead: it loads the pair itself
once; a pair that does not load (a key that is not the certificate's, a file half written, an
expired certificate) is refused with one log line and the pair in service stays. A pair that
loads is kept by the master, for the workers it forks later, and each worker is sent SIGHUP to
load it for its next connections (server/worker.py); the connections it has keep their own.
"""

from __future__ import annotations

import logging
import signal

from ..config import CERT_VARIABLE, ConfigError, TlsFiles, certificate_facts, utc_text

log = logging.getLogger("utopia_agent")


class ServedCertificate:
    """The master's pair in service: the context the workers it forks start with."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self.context = files.server_context()

    def reload(self, arbiter) -> bool:
        """The master's SIGHUP: take the files' pair if it loads, then tell every worker."""
        try:
            context = self.files.server_context()
            facts = certificate_facts(self.files.cert_file, CERT_VARIABLE)
        except ConfigError as error:  # raised out of the arbiter's loop, it would stop the agent
            log.error("SIGHUP: kept the certificate in service, the new files do not load: %s", error)
            return False
        self.context = context
        log.info("SIGHUP: new connections get the certificate in %s (%s, expires %s)", self.files.cert_file, facts.subject, utc_text(facts.not_after))
        arbiter.kill_workers(signal.SIGHUP)
        return True

    def install(self, arbiter) -> None:
        """Make the master's SIGHUP this reload (the arbiter looks its handlers up by name), and have
        each worker born with SIGHUP held (blocked) until its own handler is in place
        (server/worker.py init_signals): one that a reload sends while the worker boots would
        otherwise reach the master's handler it inherited, or gunicorn's default, and the worker
        would serve the pair it was forked with, or end."""
        arbiter.handle_hup = lambda: self.reload(arbiter)
        spawn = arbiter.spawn_worker

        def spawn_with_sighup_held():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                return spawn()
            finally:  # in the master once forked (the worker leaves spawn only to exit)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

        arbiter.spawn_worker = spawn_with_sighup_held


def note_served_certificate(files: TlsFiles) -> None:
    """Publish the expiry of the certificate this worker now serves (the lowest of the live workers' is scraped)."""
    # Imported here: gunicorn.conf.py imports this module before it sets prometheus-client's
    # multiprocess directory, which prometheus-client reads when first imported.
    from ..observability.prometheus import TLS_CERTIFICATE_EXPIRY

    try:
        TLS_CERTIFICATE_EXPIRY.labels(str(files.cert_file)).set(certificate_facts(files.cert_file, CERT_VARIABLE).not_after)
    except ConfigError:
        pass  # rewritten since it loaded: the next SIGHUP sets it

