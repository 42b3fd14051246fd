//! Codec benches: parse and emit of MAP and PEER requests and responses.
//!
//! Run: `cargo bench -p pcp-benches --bench codec`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pcp_wire::{
    Filter, MapData, Nonce, OpData, Options, PcpOption, PeerData, Request, Response, ResultCode,
};

fn map_data() -> MapData {
    MapData {
        nonce: Nonce([7; 12]),
        protocol: 6,
        internal_port: 8080,
        external_port: 40000,
        external_addr: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
    }
}

fn peer_data() -> PeerData {
    PeerData {
        map: map_data(),
        remote_port: 443,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    }
}

fn bench(c: &mut Criterion) {
    let filter = [PcpOption::Filter(Filter {
        prefix_len: 120,
        remote_port: 0,
        remote_addr: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)),
    })];
    let cases: [(&str, OpData, Options<'_>); 3] = [
        ("map", OpData::Map(map_data()), Options::NONE),
        (
            "map+filter",
            OpData::Map(map_data()),
            Options::List(&filter),
        ),
        ("peer", OpData::Peer(peer_data()), Options::NONE),
    ];
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    for (name, data, options) in cases {
        let req = Request {
            lifetime: 7200,
            client_addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
            data,
            options,
        };
        let resp = Response {
            result: ResultCode::Success,
            lifetime: 7200,
            epoch: 12345,
            data,
            options,
        };
        let mut req_bytes = [0u8; 1100];
        let req_len = req.emit(&mut req_bytes).unwrap();
        let mut resp_bytes = [0u8; 1100];
        let resp_len = resp.emit(&mut resp_bytes).unwrap();

        group.bench_function(format!("parse_request/{name}"), |b| {
            b.iter(|| pcp_wire::parse_request(black_box(&req_bytes[..req_len])).unwrap())
        });
        group.bench_function(format!("emit_request/{name}"), |b| {
            let mut out = [0u8; 1100];
            b.iter(|| black_box(&req).emit(black_box(&mut out)).unwrap())
        });
        group.bench_function(format!("parse_response/{name}"), |b| {
            b.iter(|| Response::parse(black_box(&resp_bytes[..resp_len])).unwrap())
        });
        group.bench_function(format!("emit_response/{name}"), |b| {
            let mut out = [0u8; 1100];
            b.iter(|| black_box(&resp).emit(black_box(&mut out)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
