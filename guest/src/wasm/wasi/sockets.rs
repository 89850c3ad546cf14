//! `wasi:sockets`: present, every operation denied. `instance-network` hands out a network
//! handle (it conveys no capability); creating a socket and resolving names fail with
//! `access-denied`; socket methods are unreachable because no socket is ever created.

use alloc::string::String;
use alloc::vec::Vec;

use wasmtime::component::Resource;

use super::wasi::sockets::{instance_network, ip_name_lookup, network, tcp, tcp_create_socket, udp, udp_create_socket};
use super::{Ctx, InputStream, IoError, Network, Never, OutputStream, Pollable, unreachable_resource};

impl network::Host for Ctx {
    fn network_error_code(&mut self, _err: Resource<IoError>) -> wasmtime::Result<Option<network::ErrorCode>> {
        Ok(None)
    }
}

impl network::HostNetwork for Ctx {
    fn drop(&mut self, n: Resource<Network>) -> wasmtime::Result<()> {
        self.table.delete(n)?;
        Ok(())
    }
}

impl instance_network::Host for Ctx {
    fn instance_network(&mut self) -> wasmtime::Result<Resource<Network>> {
        Ok(self.table.push(Network)?)
    }
}

impl ip_name_lookup::Host for Ctx {
    fn resolve_addresses(
        &mut self,
        _network: Resource<Network>,
        _name: String,
    ) -> wasmtime::Result<Result<Resource<Never>, network::ErrorCode>> {
        Ok(Err(network::ErrorCode::AccessDenied))
    }
}

type NetResult<T> = wasmtime::Result<Result<T, network::ErrorCode>>;
type Socket = Resource<Never>;

impl ip_name_lookup::HostResolveAddressStream for Ctx {
    fn resolve_next_address(&mut self, _s: Socket) -> NetResult<Option<network::IpAddress>> {
        Err(unreachable_resource())
    }
    fn subscribe(&mut self, _s: Socket) -> wasmtime::Result<Resource<Pollable>> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Socket) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}

impl tcp_create_socket::Host for Ctx {
    fn create_tcp_socket(
        &mut self,
        _family: network::IpAddressFamily,
    ) -> wasmtime::Result<Result<Resource<Never>, network::ErrorCode>> {
        Ok(Err(network::ErrorCode::AccessDenied))
    }
}

impl tcp::Host for Ctx {}

/// Socket methods: unreachable, since no socket is ever created.
impl tcp::HostTcpSocket for Ctx {
    fn start_bind(&mut self, _s: Socket, _n: Resource<Network>, _a: network::IpSocketAddress) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn finish_bind(&mut self, _s: Socket) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn start_connect(&mut self, _s: Socket, _n: Resource<Network>, _a: network::IpSocketAddress) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn finish_connect(&mut self, _s: Socket) -> NetResult<(Resource<InputStream>, Resource<OutputStream>)> {
        Err(unreachable_resource())
    }
    fn start_listen(&mut self, _s: Socket) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn finish_listen(&mut self, _s: Socket) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn accept(&mut self, _s: Socket) -> NetResult<(Socket, Resource<InputStream>, Resource<OutputStream>)> {
        Err(unreachable_resource())
    }
    fn local_address(&mut self, _s: Socket) -> NetResult<network::IpSocketAddress> {
        Err(unreachable_resource())
    }
    fn remote_address(&mut self, _s: Socket) -> NetResult<network::IpSocketAddress> {
        Err(unreachable_resource())
    }
    fn is_listening(&mut self, _s: Socket) -> wasmtime::Result<bool> {
        Err(unreachable_resource())
    }
    fn address_family(&mut self, _s: Socket) -> wasmtime::Result<network::IpAddressFamily> {
        Err(unreachable_resource())
    }
    fn set_listen_backlog_size(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn keep_alive_enabled(&mut self, _s: Socket) -> NetResult<bool> {
        Err(unreachable_resource())
    }
    fn set_keep_alive_enabled(&mut self, _s: Socket, _v: bool) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn keep_alive_idle_time(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_keep_alive_idle_time(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn keep_alive_interval(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_keep_alive_interval(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn keep_alive_count(&mut self, _s: Socket) -> NetResult<u32> {
        Err(unreachable_resource())
    }
    fn set_keep_alive_count(&mut self, _s: Socket, _v: u32) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn hop_limit(&mut self, _s: Socket) -> NetResult<u8> {
        Err(unreachable_resource())
    }
    fn set_hop_limit(&mut self, _s: Socket, _v: u8) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn receive_buffer_size(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_receive_buffer_size(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn send_buffer_size(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_send_buffer_size(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn subscribe(&mut self, _s: Socket) -> wasmtime::Result<Resource<Pollable>> {
        Err(unreachable_resource())
    }
    fn shutdown(&mut self, _s: Socket, _how: tcp::ShutdownType) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Socket) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}

impl udp_create_socket::Host for Ctx {
    fn create_udp_socket(
        &mut self,
        _family: network::IpAddressFamily,
    ) -> wasmtime::Result<Result<Resource<Never>, network::ErrorCode>> {
        Ok(Err(network::ErrorCode::AccessDenied))
    }
}

impl udp::Host for Ctx {}

impl udp::HostUdpSocket for Ctx {
    fn start_bind(&mut self, _s: Socket, _n: Resource<Network>, _a: network::IpSocketAddress) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn finish_bind(&mut self, _s: Socket) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn stream(&mut self, _s: Socket, _remote: Option<network::IpSocketAddress>) -> NetResult<(Socket, Socket)> {
        Err(unreachable_resource())
    }
    fn local_address(&mut self, _s: Socket) -> NetResult<network::IpSocketAddress> {
        Err(unreachable_resource())
    }
    fn remote_address(&mut self, _s: Socket) -> NetResult<network::IpSocketAddress> {
        Err(unreachable_resource())
    }
    fn address_family(&mut self, _s: Socket) -> wasmtime::Result<network::IpAddressFamily> {
        Err(unreachable_resource())
    }
    fn unicast_hop_limit(&mut self, _s: Socket) -> NetResult<u8> {
        Err(unreachable_resource())
    }
    fn set_unicast_hop_limit(&mut self, _s: Socket, _v: u8) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn receive_buffer_size(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_receive_buffer_size(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn send_buffer_size(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn set_send_buffer_size(&mut self, _s: Socket, _v: u64) -> NetResult<()> {
        Err(unreachable_resource())
    }
    fn subscribe(&mut self, _s: Socket) -> wasmtime::Result<Resource<Pollable>> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Socket) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}

impl udp::HostIncomingDatagramStream for Ctx {
    fn receive(&mut self, _s: Socket, _max: u64) -> NetResult<Vec<udp::IncomingDatagram>> {
        Err(unreachable_resource())
    }
    fn subscribe(&mut self, _s: Socket) -> wasmtime::Result<Resource<Pollable>> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Socket) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}

impl udp::HostOutgoingDatagramStream for Ctx {
    fn check_send(&mut self, _s: Socket) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn send(&mut self, _s: Socket, _datagrams: Vec<udp::OutgoingDatagram>) -> NetResult<u64> {
        Err(unreachable_resource())
    }
    fn subscribe(&mut self, _s: Socket) -> wasmtime::Result<Resource<Pollable>> {
        Err(unreachable_resource())
    }
    fn drop(&mut self, _s: Socket) -> wasmtime::Result<()> {
        Err(unreachable_resource())
    }
}
