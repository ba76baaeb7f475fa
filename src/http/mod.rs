//! The HTTP front end: plain routes, the connection demux and the hijacked process routes.
