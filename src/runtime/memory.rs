//! The in-memory runtime: containers and processes scripted by tests.
