fn main() {
    println!("chute router: not wired yet");
}
