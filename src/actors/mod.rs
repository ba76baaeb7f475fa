//! The supervisor core: Registry, Container, Process and Reaper actors.
