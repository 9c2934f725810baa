//! stratus-images
