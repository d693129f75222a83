//! Redis trouble never stops sign-outs and never overruns the quota:
//! the real binary against a real Redis that is killed, frozen, started
//! late, flushed, or reached over TLS.
