"""Language modelling with MogrifierLSTM: corpora, model, training CLI."""
