"""The command line: `qlowrank train | estimate | profile | export | demo | generate`."""
