//! The project's own test backend (temporary minimal version; being replaced).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

pub async fn tcp_echo(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

pub async fn udp_echo(socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => if let Ok((n, p)) = r { let _ = socket.send_to(&buf[..n], p).await; },
            _ = shutdown.cancelled() => return,
        }
    }
}

pub async fn http(listener: TcpListener, name: String, shutdown: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let name = name.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let body = format!("{name}\n");
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}
