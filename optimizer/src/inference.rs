//! ONNX Runtime: `tuning::runtime`, shared with the trainer.

pub use tuning::runtime::{InferenceError, Runtime, predict_labels};
