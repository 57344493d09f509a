"""Each upstream adapter against its fake over real HTTP on loopback."""
