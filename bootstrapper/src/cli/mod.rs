pub mod args;
pub mod check;
pub mod render;
