"""The work behind the SD3 Medium service: settings, contract, model loading, engine and stores."""
