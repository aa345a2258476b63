//! The project's own test backend. PLACEHOLDER: the echo helper replaces this.
