fn main() { println!("kvzip"); }
