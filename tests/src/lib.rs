//! percore-tests: integration, simulation and multi-process fault tests live here.
