//! `trimtab-demo --echo ADDR`: the demo upstream `./dev up` starts behind the data plane.

use clap::Parser;

/// Demo upstreams for trimtab.
#[derive(Debug, Parser)]
struct Args {
    /// Address of the echo upstream (WebSocket echo, byte tunnel, HTTP echo and SSE).
    #[arg(long, default_value = "127.0.0.1:18081")]
    echo: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let l = tokio::net::TcpListener::bind(args.echo).await?;
    eprintln!("demo echo upstream on {}", l.local_addr()?);
    tokio::select! {
        () = trimtab_tests::upstream::serve_echo(l) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
